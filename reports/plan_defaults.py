"""The report plan's sizes, importable without torch: :mod:`reports.report` plans with them and the command
line's help states them."""
DEFAULT_NS = (10, 100, 1000)
QUICK_NS = (10, 100)
MARGINAL_KS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)
QUICK_MARGINAL_KS = (1, 4, 16, 64)
REPLICATES, QUICK_REPLICATES = 1000, 100
SEQUENCE_FACTOR = 20  # sequence cases run with n = 1 and this many times the replicates
