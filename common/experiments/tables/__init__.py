"""The table registry: paper tables as YAML files, our runs beside the published numbers.

Each file in `configs/tables/` names one table of one paper::

    table: glance_table5                  # id (also the run-name prefix)
    title: GLANCE Table 5 — ablation on LUNA16 and Tianchi detection
    source: GLANCE (npj Digit. Med. 2025), Table 5
    command: lungseg                      # CLI of every row (a row may name another)
    stages: [fit, test]                   # what a missing run executes; the last one is read
    checkpoint: best                      # the fit checkpoint the last stage evaluates: best | last
    scale: 100                            # our value × scale = the paper's unit (fractions → percent)
    digits: 1
    base: [configs/x.yaml]                # configs every run starts from (optional)
    parts:                                # settings a column's run uses (default: one part "default")
      luna16: {config: [configs/glance_luna16.yaml]}
      tianchi: {config: [configs/glance_tianchi.yaml]}
    folds: {values: [0, 1, 2], override: "--data.init_args.fold={fold}"}   # optional: mean ± std over folds
    columns:
      - {name: luna16_f1, label: LUNA16 F1, part: luna16, metric: test/f1}
    rows:
      - name: full
        label: Full GLANCE
        config: [configs/glance/full.yaml]        # layered after base and the part's configs
        overrides: ["--model.init_args.lr=1e-4"]  # LightningCLI overrides
        run: glance-full                          # run-name stem, shared by tables that run the same thing
        published: {luna16_f1: 93.2}
      - {name: nodulenet, label: NoduleNet, reference: true, published: {luna16_f1: 87.8}}

A run is `<command> <stage> --config … <overrides> --run_name <run> --trainer.default_root_dir <runs>` and its
name is `<run or table-row>[-<part>][-fold<k>]`. Rows marked `reference` are other authors' methods: only the
paper's numbers are shown. A part may be a `function: module:callable` instead of a run (deterministic
measurements such as parameter counts), named in the package that owns the model (e.g.
`lungcls.complexity:m3net_complexity`: `common` never imports the method packages); its result is stored
like a run so `--from-runs` reads it.
`include: other.yaml` takes every key from another file (e.g. a package's run table in `configs/m3net/`), this
file's keys winning. `paired_test: {column: c, reference: row}` adds a paired t-test over folds.

Nothing is invented: a row without a finished run shows "not run", a run that did not log a metric shows
"not logged", and a value the paper does not give shows "—".

Modules: `spec` (the schema, parsing, the registry), `render` (our numbers collected from a runs folder,
markdown and CSV), `run` (what a table is missing: planned runs, prerequisites, functions, dry runs).
"""

from common.experiments.tables.render import (
    Cell,
    RowResult,
    TableResult,
    collect,
    render_csv,
    render_markdown,
    write_outputs,
)
from common.experiments.tables.run import (
    check_plans_data,
    dry_run_commands,
    execute_plan,
    execute_prerequisite,
    missing_plans,
    missing_prerequisites,
    render_table,
)
from common.experiments.tables.spec import (
    COMPUTE_STAGE,
    NO_VALUE,
    NOT_LOGGED,
    NOT_RUN,
    ColumnSpec,
    FoldSpec,
    PartSpec,
    Prerequisite,
    RowSpec,
    RunPlan,
    TableError,
    TableSpec,
    configs_for,
    fill_placeholders,
    list_tables,
    load_table,
    parse_table,
    repo_root,
    table_path,
)

__all__ = [
    "COMPUTE_STAGE",
    "Cell",
    "ColumnSpec",
    "FoldSpec",
    "NOT_LOGGED",
    "NOT_RUN",
    "NO_VALUE",
    "PartSpec",
    "Prerequisite",
    "RowResult",
    "RowSpec",
    "RunPlan",
    "TableError",
    "TableResult",
    "TableSpec",
    "check_plans_data",
    "collect",
    "configs_for",
    "dry_run_commands",
    "execute_plan",
    "execute_prerequisite",
    "fill_placeholders",
    "list_tables",
    "load_table",
    "missing_plans",
    "missing_prerequisites",
    "parse_table",
    "render_csv",
    "render_markdown",
    "render_table",
    "repo_root",
    "table_path",
    "write_outputs",
]
