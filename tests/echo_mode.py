"""A mode for the entry-point tests: records the config it was run with."""

import pathlib


def run(config, workdir):
  path = pathlib.Path(workdir) / "received.json"
  path.write_text(config.to_json())
