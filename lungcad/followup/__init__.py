"""Follow-up of one patient across scans (SPEC §11): registration, nodule matching, growth.

* `registration` — current scan → prior scan, rigid then affine on the lungs (SimpleITK), with checks that
  flag a registration that did not converge or is implausible;
* `matching` — optimal one-to-one assignment of nodules on registered distance, gated by size;
* `growth` — volume change, volume doubling time with a 95 % interval, status and the Lung-RADS
  follow-up category.

`lungcad.commands.followup` ties them together and writes followup.json / .csv / .html.
"""
