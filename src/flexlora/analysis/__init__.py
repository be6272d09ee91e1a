"""The analysis side: what a comparison grid runs and what its reports say.

- cells.py        the grid's cells (methods x resource profiles x seeds) and its folder (grid.json)
- runner.py       `flexlora compare`: runs the missing cells, then writes the report
- report.py       compare.md, compare.csv, cells.csv from the finished cells
- differences.py  the paired differences (against the baseline, FlexLoRA against each rival,
                  variants against their plain method): tables, CSV files, seeds needed
- stats.py        paired bootstrap intervals (examples; seeds and examples; seeds and held-out
                  categories) and the t-based seeds-needed calculation
- figures.py      forest.png and scores.png
- rank_report.py  `flexlora rank-report`: the rank-collapse study's summary from runs' spectra

Nothing here trains or evaluates a model except runner.py, through flexlora.engines.
"""
