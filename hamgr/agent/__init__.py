"""The per-host agent: owns the data plane, runs the epoch engines of its primary units and the
standby stores of its standby units, persists its state, and serves the control channel.

`hamgr agent run --state-dir DIR` (or `python -m hamgr.agent run ...`) runs it; see
`hamgr.agent.daemon` for its threads and docs/agent.md for operating it.
"""
