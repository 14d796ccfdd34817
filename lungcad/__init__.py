"""lungcad: the application layer — analysis of new scans with a bundle of the three trained models.

Sits above ``lungdet``, ``lungseg`` and ``lungcls`` (it imports them; they never import it) and above
``common``. The ``lungcad`` command's sub-commands live in ``lungcad.commands`` (see ``lungcad.cli``).
Everything it writes is research decision support, not a diagnosis.
"""

__all__ = ["DISCLAIMER"]

#: Printed in every report lungcad writes.
DISCLAIMER = (
    "Research decision support, not a diagnosis: results of machine-learning models that have not been "
    "cleared for clinical use. A qualified reader must review every finding."
)
