"""circuit-catalog: discover feature circuits and question them with SQL.

    python cli.py demo                       # load the released zoo, discover every task, commit
    python cli.py query "SELECT ..." --format csv

The commands live in the `commands` package, one module per family; this file only runs them.
"""

from commands import main

if __name__ == "__main__":
    main()
