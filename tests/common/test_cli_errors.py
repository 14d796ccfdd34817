"""`common.lightning.cli`: jsonargparse's multi-line errors become one line with the key, where it was
written and the closest valid keys (issue 19 item 5); the messages are jsonargparse 4.53's own."""

from __future__ import annotations

from common.lightning.cli import explain_parser_error

MODEL_TYPO = """Parser key "model":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'common.lightning.task.BaseTask'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'lungdet.task.CandidateTask':
        Option 'widht' is not accepted
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._util.NestedArg'>
  Given value: NestedArg(key='widht', val='8')"""

TRAINER_OPTIONS = ["--trainer.max_epochs", "--trainer.max_steps", "--trainer.min_epochs", "--seed_everything"]


def test_model_key_typo_on_the_command_line():
    text = explain_parser_error(MODEL_TYPO, ["fit", "--model.init_args.widht", "8"])
    assert text.startswith("unknown config key model.init_args.widht on the command line")
    assert "did you mean width?" in text and "\n" not in text


def test_model_key_typo_in_yaml_names_file_and_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  init_args:\n    widht: 8\n")
    text = explain_parser_error(MODEL_TYPO, ["fit", "--config", str(config)])
    assert f"in {config}:3" in text and "did you mean width?" in text


def test_trainer_typo_cli_and_yaml(tmp_path):
    text = explain_parser_error("unrecognized arguments: --trainer.max_epohcs 3", [], TRAINER_OPTIONS)
    assert text.startswith("unknown option --trainer.max_epohcs") and "--trainer.max_epochs" in text
    config = tmp_path / "t.yaml"
    config.write_text("trainer:\n  max_epohcs: 3\n")
    message = "Subcommand 'fit' does not accept option 'trainer.max_epohcs'"
    text = explain_parser_error(message, ["fit", "-c", str(config)], TRAINER_OPTIONS)
    assert f"in {config}:2" in text and "trainer.max_epochs" in text


def test_bad_value_names_key_and_type():
    message = (
        'Parser key "trainer.max_epochs":\n  Does not validate against any of the Union subtypes\n'
        "  Errors:\n    - Expected a <class 'int'>\n    - Expected a <class 'NoneType'>\n"
        "  Given value type: <class 'str'>\n  Given value: abc"
    )
    text = explain_parser_error(message, ["fit", "--trainer.max_epochs", "abc"])
    assert text == "invalid value 'abc' for trainer.max_epochs on the command line (expected int or NoneType)"


def test_a_class_refusal_in_a_class_path_union_is_its_own_line():
    """A datamodule's own ValueError, as jsonargparse wraps it when instantiating a `class_path` union."""
    from common.lightning.cli import class_refusal

    message = (
        "Does not validate against any of the Union subtypes\nSubtypes: [<class 'x.CacheDataModule'>, "
        "<class 'NoneType'>]\nErrors:\n  - eval_candidates must be 'same' or 'stage1', got 'bogus'\n"
        "  - Expected a <class 'NoneType'>\nGiven value type: <class 'jsonargparse._namespace.Namespace'>"
    )
    assert class_refusal(message) == "eval_candidates must be 'same' or 'stage1', got 'bogus'"
    assert (
        class_refusal(" ".join(message.split())) == "eval_candidates must be 'same' or 'stage1', got 'bogus'"
    )
    typed = "Does not validate against any of the Union subtypes Errors: - Expected a <class 'int'> - Expected a <class 'NoneType'>"
    assert class_refusal(typed) is None
