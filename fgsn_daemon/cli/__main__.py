"""`python -m fgsn_daemon.cli`: the fgsn command line."""

from fgsn_daemon.cli.main import main

main()
