"""JSON Schemas of the files lungcad writes (report.json, bundle.json, followup.json); a package so they ship
in the wheel."""
