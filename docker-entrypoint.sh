#!/bin/sh
# The image's entry point.
#   docker run IMAGE                          -> process.py: /input -> /output (Grand Challenge)
#   docker run IMAGE -i /input --format pace  -> process.py with those options (anything starting with -)
#   docker run IMAGE python main.py -i ...    -> that command as given, in /opt/app (the PACE template)
set -e
case "${1:-}" in
  "" | -*) exec python3 /opt/app/process.py "$@" ;;
  *) exec "$@" ;;
esac
