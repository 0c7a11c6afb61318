"""The mutation report's ledger of equivalent edits: matched by function and changed line."""

from benchmarks.mutation_score import Equivalent, changed_lines, explain, load_equivalents

DIFF = """--- systems/sampling.py
+++ systems/sampling.py
@@ -1,3 +1,3 @@
 def f(p, q):
-    if u < min(1.0, r):
+    if u <= min(1.0, r):
         return 1
"""


def test_changed_lines_leave_out_the_headers():
    assert changed_lines(DIFF) == (["if u < min(1.0, r):"], ["if u <= min(1.0, r):"])


def test_a_survivor_is_explained_only_by_its_own_function_and_line():
    entry = Equivalent("systems.sampling.x_f", "if u < min(1.0, r):", "if u <= min(1.0, r):", "probability zero")
    assert explain("systems.sampling.x_f__mutmut_7", DIFF, [entry]) is entry
    assert explain("systems.sampling.x_g__mutmut_7", DIFF, [entry]) is None  # another function
    other = Equivalent("systems.sampling.x_f", "if u < min(1.0, r):", "if u < min(2.0, r):", "u < 1")
    assert explain("systems.sampling.x_f__mutmut_7", DIFF, [other]) is None  # another edit


def test_the_ledger_parses_and_every_entry_gives_a_reason():
    entries = load_equivalents()
    assert entries, "benchmarks/mutation_equivalents.toml is empty"
    for e in entries:
        assert e.function.count(".") >= 2 and e.before != e.after and len(e.why) > 20, e


def test_a_repeated_line_is_told_apart_by_its_context():
    diff = """--- a.py
+++ a.py
@@ -1,4 +1,4 @@
     elif not edge.awaiting:
         send()
-        x = 1.0
+        x = 2.0
"""
    here = Equivalent("m.x_f", "x = 1.0", "x = 2.0", "reached only at the end", ("elif not edge.awaiting:",))
    elsewhere = Equivalent("m.x_f", "x = 1.0", "x = 2.0", "reached only at the end", ("def close():",))
    assert explain("m.x_f__mutmut_1", diff, [here]) is here
    assert explain("m.x_f__mutmut_1", diff, [elsewhere]) is None


def test_unchecked_lists_only_the_mutants_not_run_yet_that_the_glob_names():
    from benchmarks.mutation_score import unchecked

    results = {"systems/protocol.py": {"systems.protocol.x_f__mutmut_2": "not checked",
                                       "systems.protocol.x_f__mutmut_1": "not checked",
                                       "systems.protocol.x_g__mutmut_1": "killed"},
               "harness/link.py": {"harness.link.x_h__mutmut_1": "not checked",
                                   "harness.link.x_h__mutmut_2": "survived"}}
    assert unchecked(results, "systems.protocol.*") == ["systems.protocol.x_f__mutmut_1",
                                                        "systems.protocol.x_f__mutmut_2"]
    assert unchecked(results) == ["harness.link.x_h__mutmut_1", "systems.protocol.x_f__mutmut_1",
                                  "systems.protocol.x_f__mutmut_2"]


def test_rerun_lists_what_a_quick_pass_did_not_kill_and_the_ledger_does_not_explain():
    from benchmarks.mutation_score import to_rerun

    results = {"systems/protocol.py": {"systems.protocol.x_f__mutmut_1": "survived",
                                       "systems.protocol.x_f__mutmut_2": "survived",  # in the ledger
                                       "systems.protocol.x_f__mutmut_3": "segfault",  # stopped at its CPU limit
                                       "systems.protocol.x_f__mutmut_4": "killed",
                                       "systems.protocol.x_f__mutmut_5": "not checked"},
               "harness/link.py": {"harness.link.x_h__mutmut_1": "survived"}}
    ledger = {"systems.protocol.x_f__mutmut_2"}
    explained = lambda name, module: name in ledger  # noqa: E731
    assert to_rerun(results, "systems.protocol.*", explained) == ["systems.protocol.x_f__mutmut_1",
                                                                  "systems.protocol.x_f__mutmut_3"]
    assert to_rerun(results, "*", explained) == ["harness.link.x_h__mutmut_1", "systems.protocol.x_f__mutmut_1",
                                                 "systems.protocol.x_f__mutmut_3"]


def test_the_unchecked_names_come_on_one_line_for_make(tmp_path, capsys):
    """``make mutate MUTANTS="$(... --unchecked GLOB)"``: a newline in a make variable ends the
    recipe's command line, so the names must come space-separated."""
    import json

    from benchmarks.mutation_score import main

    meta = tmp_path / "systems" / "protocol.py.meta"
    meta.parent.mkdir()
    meta.write_text(json.dumps({"exit_code_by_key": {"systems.protocol.x_f__mutmut_1": None,
                                                     "systems.protocol.x_f__mutmut_2": None,
                                                     "systems.protocol.x_g__mutmut_1": 1}}))
    assert main(["--mutants", str(tmp_path), "--unchecked", "systems.protocol.*"]) == 0
    out = capsys.readouterr().out
    assert out == "systems.protocol.x_f__mutmut_1 systems.protocol.x_f__mutmut_2\n"


def test_shared_fixtures_run_per_test_only_while_mutmut_records_coverage(monkeypatch):
    from tests.support import shared_scope

    monkeypatch.delenv("MUTANT_UNDER_TEST", raising=False)
    assert shared_scope("pipesd_run", None) == "module"
    monkeypatch.setenv("MUTANT_UNDER_TEST", "systems.protocol.x_f__mutmut_1")  # a mutant's run
    assert shared_scope("pipesd_run", None) == "module"
    monkeypatch.setenv("MUTANT_UNDER_TEST", "stats")
    assert shared_scope("pipesd_run", None) == "function"
