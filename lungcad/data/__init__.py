"""Data files of lungcad (a package so that the project's package-data rule, "*.yaml", ships them)."""
