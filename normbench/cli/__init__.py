"""The command line: one thin module per command (parse, call the library, print, exit).

app.py      the command group: one-line usage errors, fail(), --version
train.py    normbench train          data.py     normbench data prepare
sweep.py    normbench sweep          report.py   normbench report
analyze.py  normbench analyze        listing.py  normbench list
evaluate.py normbench eval           export.py   normbench export
describe.py one line about a config  program.py  the executable: every command registered
"""
from normbench.cli.program import app, main  # the console script is normbench.cli:main

__all__ = ["app", "main"]
