"""Test and demo NFs (C sources under ``src/``) and the offline builder of their OCI images."""
