"""`python -m hamgr.agent run --state-dir DIR [--netns NAME]` is `hamgr agent run ...`."""

from hamgr.cli import agent

agent.main(prog_name="python -m hamgr.agent")
