from gce.cli import entry

entry()
