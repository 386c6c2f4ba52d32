"""`python -m vitcore.report [NAME=]RUN_DIR ...`: the results table (see `vitcore.report.table`)."""

from vitcore.report.table import main

main()
