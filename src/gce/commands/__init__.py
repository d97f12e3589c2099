"""One module per ``gce`` sub-command: each adds its parser and runs it."""
