"""Mutation testing of the modules that guard the runtime's promises, with mutmut, one module at a time.

Each module is mutated in its own scratch copy of the project (`.mutation/<module>/`), and each mutant
runs only the tests of that module's test files that cover the mutated function. Prints the kill
ratio per module and lists the survivors (their diffs go to `.mutation/<module>/survivors.txt`).

Run through `scripts/mutation [module ...]` (which installs the `mutation` extra); not part of CI.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".mutation"


@dataclass(frozen=True)
class Target:
    """One module to mutate: its file, optionally only some functions, and the tests that guard it."""

    name: str
    path: str
    tests: list[str]
    # mutmut function names (`x_function`, `xǁClassǁmethod`) to mutate; empty means the whole module.
    functions: list[str] = field(default_factory=list)
    # Seconds a test may run against a mutant (pytest-timeout), a few times its tests' longest clean
    # run: a mutant that leaves a test waiting is cut here, not at the suite's 300 s. mutmut's own
    # limit counts CPU seconds, which a test awaiting forever does not spend. The timeout ends the
    # mutant's whole test process (a timer thread), which no `except` in the code under test can stop.
    timeout: int = 60


# The one list to update when a module moves (see the layout map of issue 12) or a test file is split.
TARGETS: list[Target] = [
    # The store also serves the audit reads, the runs' ends, the replay and the projections' catch-up
    # and rebuild: their tests (of the projections, those that reach the store's catch-up reads).
    Target(
        "store",
        "domain/store.py",
        [
            "tests/test_store.py",
            "tests/test_audit.py",
            "tests/test_run_ends.py",
            "tests/test_streaming.py",
            *(
                f"tests/test_projections.py::{test}"
                for test in (
                    "test_rebuild_of_one_chat_replaces_only_its_documents",
                    "test_rebuild_removes_documents_of_chats_the_log_does_not_have",
                    "test_rebuild_while_the_runner_is_live_converges_to_the_log",
                    "test_resume_token_that_expired_is_recovered_by_catching_up_from_the_log",
                    "test_catch_up_reads_only_what_each_chat_is_missing_and_a_writer_counts_what_it_had_applied",
                    "test_a_chat_whose_first_record_is_unreadable_is_left_out_and_every_other_chat_rebuilt",
                    "test_corrupt_record_stops_only_its_chat",
                )
            ),
        ],
    ),
    # The group commit under store.append (split out of store.py on 2026-12-01).
    # Their tests run 7 s at most; a broken commit leaves its callers waiting.
    Target("commit", "domain/commit.py", ["tests/test_store.py"], timeout=25),
    Target(
        "events",
        "domain/events.py",
        [
            "tests/test_store.py",
            "tests/test_api.py",
            "tests/test_quality.py::test_client_frame_decoder_accepts_exactly_the_well_formed_frames",
            "tests/test_quality.py::test_stored_record_decoder_refuses_anything_malformed_naming_chat_and_seq",
            "tests/test_quality.py::test_a_sealed_record_decodes_and_any_broken_field_of_it_is_refused",
        ],
    ),
    Target("writer", "projections/writer.py", ["tests/test_projections.py"]),
    Target("rebuild", "projections/rebuild.py", ["tests/test_projections.py"]),
    Target("auth", "app/http/auth.py", ["tests/test_auth.py", "tests/test_api.py"]),
    Target(
        "api-authz",
        "app/http/controllers.py",
        ["tests/test_api.py"],
        [
            "x_owned_chat",
            "xǁChatControllerǁlist_chats",
            "xǁChatControllerǁevents",
            "xǁMetricsControllerǁchat",
        ],
    ),
    Target(
        "transport-authz",
        "app/http/transport.py",
        ["tests/test_api.py", "tests/test_transport.py"],
        ["xǁChatConnectionǁhandle", "x__principal"],
        timeout=300,  # the reconnect-at-twenty-points test runs about 80 s
    ),
    Target(
        "leases",
        "app/runs/supervisor.py",
        [
            "tests/test_run_ends.py",
            "tests/test_api.py",
            # The one test that sends a client's message id through `post_message` (AG-UI's run id).
            "tests/test_agui.py::test_a_known_thread_continues_the_chat_and_a_repeated_request_records_nothing",
        ],
        [
            "xǁRunSupervisorǁ_acquire",
            "xǁRunSupervisorǁ_release",
            "xǁRunSupervisorǁ_renew",
            "xǁRunSupervisorǁstart",
            "xǁRunSupervisorǁ_lease_of_live_run",
            "xǁRunSupervisorǁpost_message",
            "xǁRunSupervisorǁobey_stops",
            "xǁRunSupervisorǁrecover_expired",
        ],
        timeout=20,  # their tests run 3 s at most; a broken sweep leaves them waiting 30-60 s
    ),
    # Issue 29: the modules added in the last wave, each with only the tests that state its promises.
    # The anchors (whole module): judging a chat against its anchor (removed tail, deleted chat,
    # rewritten head, bad signature), the scan of an app's anchor chain and the comparison with an
    # exported copy, their signing, and appending, indexing and reading them.
    Target(
        "anchors",
        "domain/anchors.py",
        [
            f"tests/test_audit.py::{test}"
            for test in (
                "test_a_removed_tail_a_deleted_chat_and_an_edited_anchor_are_reported",
                "test_verifying_one_app_reads_that_apps_chats_and_anchors_only_and_says_how_many",
                "test_a_head_resealed_on_its_real_predecessor_a_chain_broken_before_its_anchor_and_a_deleted_chat",
                "test_each_fault_of_the_anchor_chains_and_of_a_copy_kept_apart_is_named",
                "test_a_chats_own_verify_names_an_edited_anchor_after_what_its_chain_shows",
                "test_anchors_signed_by_this_version_verify_in_the_next_the_key_and_signature_are_fixed",
                "test_anchors_are_written_durably_numbered_once_per_app_and_read_newest_first_and_in_order",
            )
        ],
        timeout=60,
    ),
    # The audit (whole module): the filtered read of many chats (its plans, index ranges, checks,
    # merge, cursor and paging) and the verification of the whole log or one app (which chats and
    # anchors it reads, what it counts).
    Target(
        "audit",
        "domain/audit.py",
        [
            f"tests/test_audit.py::{test}"
            for test in (
                "test_each_filter_returns_exactly_the_matching_records_of_the_callers_app",
                "test_store_find_returns_exactly_the_records_matching_every_filter_in_one_chat_or_all",
                "test_paging_while_appends_continue_misses_and_repeats_nothing",
                "test_every_documented_filter_is_served_by_an_index",
                "test_records_of_several_types_at_one_instant_come_in_chat_then_seq_order_and_pages_keep_the_window",
                "test_a_cursor_out_of_range_or_cut_is_refused_naming_it_and_every_valid_one_is_read_back",
                "test_a_removed_tail_a_deleted_chat_and_an_edited_anchor_are_reported",
                "test_verifying_one_app_reads_that_apps_chats_and_anchors_only_and_says_how_many",
                "test_a_head_resealed_on_its_real_predecessor_a_chain_broken_before_its_anchor_and_a_deleted_chat",
                "test_verifying_the_log_checks_each_forks_anchor_in_its_parent_the_logs_last_chat_included",
                "test_verifying_an_app_checks_its_interleaved_chats_and_reports_progress_over_its_records",
            )
        ]
        # The one test that verifies the whole log with a fork in it through a node.
        + [
            "tests/test_lineage.py::test_a_fork_at_a_middle_message_continues_alone_and_its_verify_checks_the_anchor"
        ],
        timeout=30,  # their tests run 7 s at most (setup included)
    ),
    # The recorder (whole module): how streamed chunks become `message.delta`s and each reply's
    # `message.agent` (message ids, text); how each AG2 event becomes its record (`map_one`: tool
    # calls and results, speakers, input requests, handoffs, raw events, the live objects of their
    # JSON), who may see it (`visible`, `unnamed`) and a UI tool's request (`map_ui`).
    Target(
        "recorder",
        "app/runs/recorder.py",
        [
            f"tests/test_streaming.py::{test}"
            # The mapper's own test first: mutmut's forced-fail check runs the selection in its own
            # process, and a run failing under a live client's test only ends at the test's timeout,
            # which ends that process.
            for test in (
                "test_a_retried_call_starts_a_new_message_and_leaves_the_first_attempt_incomplete",
                "test_a_300_chunk_answer_reaches_a_live_client_while_the_model_still_writes",
                "test_an_interrupted_message_keeps_its_deltas_and_is_replayed_as_text_so_far",
                "test_a_stream_cut_off_mid_answer_fails_the_run_and_keeps_what_was_said",
                "test_a_stream_cut_off_mid_answer_is_retried_as_a_new_message",
                "test_text_streamed_with_a_tool_call_becomes_a_message_before_the_call",
                "test_one_agents_replies_in_a_row_each_get_a_new_message_id_and_only_their_own_text",
            )
        ]
        # A reply that did not stream (structured replies never do) is recorded whole.
        + [
            "tests/test_structured.py::test_an_invalid_reply_is_recorded_and_asked_again_then_the_valid_one_is_structured"
        ]
        # Every AG2 event of the example workflows recorded (patterns, tools, input, handoffs, stop).
        + [
            f"tests/test_orchestration.py::{test}"
            for test in (
                "test_example_workflow_runs_end_to_end_with_every_event_recorded",
                "test_visibility_follows_visual_agents",
                "test_round_robin_gives_the_floor_in_agent_order",
                "test_default_pattern_follows_the_llm_handoff",
                "test_an_ag2_events_live_objects_are_stored_as_json_each_in_its_documented_form",
                "test_an_ag2_event_that_is_not_a_model_is_kept_as_its_type_and_repr_and_names_only_a_group_agent",
                "test_a_tool_call_is_recorded_under_its_caller_with_its_arguments_as_written",
                "test_random_pattern_picks_other_agents_of_the_set",
                "test_auto_pattern_lets_the_group_manager_choose",
                "test_a_raising_tool_gives_an_error_result_and_the_run_continues",
                "test_a_tool_missing_from_tools_json_is_never_callable",
                "test_llm_call_totals_equal_the_scripted_clients_own_count",
                "test_human_input_is_answered_through_the_log",
                "test_a_run_stopped_in_the_log_cancels_the_run",
            )
        ]
        # Hidden agents stay hidden; a UI tool's request names its call.
        + [
            "tests/test_visibility.py",
            "tests/test_ui.py::test_intake_answered_by_websocket_and_rest_bad_answers_recording_nothing",
            "tests/test_ui.py::test_agui_client_gets_the_tool_call_and_an_interrupt_then_answers_with_a_tool_message",
        ],
        timeout=20,  # their tests run 2 s at most
    ),
    # AG-UI (whole module but the route, which is decorated and so skipped by mutmut): resume
    # positions (each event's SSE id, the `Last-Event-ID` position, which events of a record a resume
    # sends), the run's event stream, the translation of every record type (messages and streamed
    # deltas, tool calls, context, interrupts, UI requests, run ends) and the recording of a request's
    # turn (`begin`: a new or known thread, a repeat, a resume, a UI tool's answer).
    Target(
        "agui",
        "app/http/agui.py",
        [
            f"tests/test_agui.py::{test}"
            for test in (
                "test_a_new_thread_starts_a_chat_and_streams_its_visible_log",
                "test_a_known_thread_continues_the_chat_and_a_repeated_request_records_nothing",
                "test_an_input_request_ends_the_run_with_an_interrupt_that_resume_answers",
                "test_reconnecting_with_last_event_id_mid_run_ends_with_the_same_events_as_an_unbroken_stream",
                "test_a_failed_run_is_a_run_error_and_a_stopped_one_is_cancelled",
                "test_streamed_deltas_become_content_events_and_the_final_message_only_closes_them",
                "test_each_message_event_names_its_role_agent_and_time_and_a_final_text_sends_only_what_was_not_streamed",
                "test_tool_calls_context_custom_records_ui_requests_and_each_run_end_become_their_agui_events",
                "test_a_continuing_turn_starts_with_the_chats_state_and_a_snapshot_of_each_agent_message_and_tool_call_with_its_results",
                "test_the_new_turn_is_the_last_user_messages_text_parts_joined_and_one_with_no_text_is_refused",
                "test_a_resume_payload_answers_with_its_text_its_text_field_or_else_its_json",
                "test_errors_have_one_shape_and_users_reach_only_their_own_threads",
                "test_an_idle_stream_gets_keepalives_and_a_client_that_leaves_frees_its_subscription",
                "test_agui_runs_count_against_the_chat_start_rate_limit",
                "test_resuming_after_a_records_last_event_sends_nothing_of_it_again_and_ids_before_the_run_are_refused",
            )
        ]
        # A UI tool's call, its interrupt and the tool message that answers it; an AgentDriven start.
        + [
            "tests/test_ui.py::test_agui_client_gets_the_tool_call_and_an_interrupt_then_answers_with_a_tool_message",
            "tests/test_start_modes.py::test_an_agent_driven_chat_starts_on_creation_and_its_agent_speaks_first",
        ],
        timeout=60,
    ),
    Target(
        "errors",
        "app/http/errors.py",
        [
            *(
                f"tests/test_contract.py::{test}"
                for test in (
                    "test_each_error_a_route_raises_answers_its_status_code_and_headers_and_an_unexpected_one_hides_its_cause",
                    "test_every_error_has_one_shape_litestars_own_included",
                    "test_every_2xx_of_every_route_has_a_schema",
                    "test_rest_and_the_websocket_name_an_error_with_the_same_code",
                )
            ),
            "tests/faults/test_database.py::test_a_raw_connection_failure_under_any_rest_route_answers_503_storage_unavailable_with_retry_after",
        ],
    ),
    # The stop of a run (on this node, on another, on a dead one); the sweep of lost runs
    # (`recover_expired`) is `sweep`'s, below.
    Target(
        "stop",
        "app/runs/supervisor.py",
        [
            "tests/test_run_ends.py",
            # The one test that stops a run on the node that runs it (over REST).
            "tests/test_api.py::test_continue_a_finished_chat_and_answer_input_over_rest",
        ],
        ["xǁRunSupervisorǁstop"],
        timeout=30,  # their tests run 3 s at most; a stop that waits on a mark waits 10 s
    ),
    # The sweep of lost runs alone (also in `leases`, whose whole run is too long for 2 cores).
    Target(
        "sweep",
        "app/runs/supervisor.py",
        ["tests/test_run_ends.py"],
        ["xǁRunSupervisorǁrecover_expired"],
        timeout=20,  # their tests run 5 s at most; a broken sweep leaves them waiting 30-60 s
    ),
]

COPIED = ["app", "domain", "projections", "tools", "tests", "workflows", "pyproject.toml"]
SOURCE_PATHS = ["app", "domain", "projections"]
KILLED = {"killed", "timeout", "caught by type check"}
STATUS_LINE = re.compile(r"^\s+(?P<name>\S+): (?P<status>.+)$")


def prepare(target: Target, fresh: bool) -> Path:
    """A scratch copy of the project whose pyproject points mutmut at `target`.

    mutmut's results in an existing copy are kept (it retests only functions whose code changed),
    unless `fresh`.
    """
    work = WORK / target.name
    if fresh and work.exists():
        shutil.rmtree(work)
    for name in COPIED:
        if (work / name).is_dir():
            shutil.rmtree(work / name)
    work.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "node_modules", "test-artifacts", "browser")
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, work / name, ignore=ignore)
        else:
            shutil.copy2(source, work / name)
    # mutmut maps tests to the functions they reach once, and again only for new tests: drop the map
    # so an edited test is seen reaching what it now reaches (costs one run of the selection).
    (work / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    tests = ", ".join(f'"{t}"' for t in target.tests)
    sources = ", ".join(f'"{s}"' for s in SOURCE_PATHS)
    with (work / "pyproject.toml").open("a") as config:
        config.write(
            "\n[tool.mutmut]\n"
            f"source_paths = [{sources}]\n"
            f'only_mutate = ["{target.path}"]\n'
            'also_copy = ["tools", "workflows"]\n'
            f"pytest_add_cli_args_test_selection = [{tests}]\n"
            f'pytest_add_cli_args = ["-p", "no:cacheprovider", "--timeout", "{target.timeout}", "--timeout-method", "thread"]\n'
            "use_git_change_detection = false\n"
        )
    return work


def module_of(target: Target) -> str:
    return target.path.removesuffix(".py").replace("/", ".")


def patterns(target: Target) -> list[str]:
    """mutmut name globs of the mutants to run (`module.function__mutmut_N`)."""
    module = module_of(target)
    if not target.functions:
        return [f"{module}.*"]
    return [f"{module}.{function}__mutmut_*" for function in target.functions]


def mutmut(work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "MOZAIKS_TEST_DOCKER": "never"}
    return subprocess.run(
        [sys.executable, "-m", "mutmut", *args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def statuses(work: Path, target: Target) -> dict[str, str]:
    """Each of the target's mutants and its outcome (`killed`, `survived`, `no tests`, `timeout`, ...)."""
    listing = mutmut(work, "results", "--all", "true")
    found: dict[str, str] = {}
    for line in listing.stdout.splitlines():
        match = STATUS_LINE.match(line)
        if match and any(fnmatch.fnmatchcase(match["name"], p) for p in patterns(target)):
            found[match["name"]] = match["status"].strip()
    return found


def run(target: Target, children: int, fresh: bool) -> tuple[int, int, list[str], float]:
    """Mutate `target`, run its tests against every mutant; returns (killed, total, survivors, seconds)."""
    started = time.monotonic()
    work = prepare(target, fresh)
    print(f"== {target.name}: {target.path} against {', '.join(target.tests)}", flush=True)
    # mutmut re-tests every mutant it is given by name, so name only those an earlier run did not
    # kill; mutmut itself resets the results of functions whose code changed, and the second pass
    # tests those (and any new mutants). One name is enough to make it regenerate the mutants.
    earlier = statuses(work, target) if (work / "mutants").is_dir() else {}
    first = [name for name, status in earlier.items() if status not in KILLED] or sorted(earlier)[:1]
    logs = []
    for names in (first or patterns(target), None):
        if names is None:
            names = [name for name, status in statuses(work, target).items() if status == "not checked"]
            if not names:
                break
        done = mutmut(work, "run", "--max-children", str(children), *names)
        logs.append(done.stdout + done.stderr)
    (work / "run.log").write_text("\n".join(logs))
    found = statuses(work, target)
    if not found:
        print(f"   mutmut produced no results; see {work / 'run.log'}", flush=True)
        print("\n".join(logs[-1].splitlines()[-15:]), flush=True)
        return 0, 0, [], time.monotonic() - started
    unchecked = [name for name, status in found.items() if status == "not checked"]
    if unchecked:
        print(
            f"   {len(unchecked)} mutants were not run (mutmut stopped early; see {work / 'run.log'})",
            flush=True,
        )
        found = {name: status for name, status in found.items() if status != "not checked"}
    survivors = sorted(name for name, status in found.items() if status not in KILLED)
    with (work / "survivors.txt").open("w") as report:
        for name in survivors:
            report.write(mutmut(work, "show", name).stdout + "\n")
    killed = len(found) - len(survivors)
    return killed, len(found), [f"{name} ({found[name]})" for name in survivors], time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "modules", nargs="*", help=f"modules to run (default all): {[t.name for t in TARGETS]}"
    )
    parser.add_argument("--children", type=int, default=2, help="mutants tested at once (default 2)")
    parser.add_argument("--fresh", action="store_true", help="forget earlier results in .mutation/")
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="FUNCTION",
        help="mutate only these functions (mutmut names, e.g. 'xǁAnchorBookǁappend'): a target's run in parts",
    )
    options = parser.parse_args()
    unknown = set(options.modules) - {t.name for t in TARGETS}
    if unknown:
        parser.error(f"unknown module(s) {sorted(unknown)}; known: {[t.name for t in TARGETS]}")
    chosen = [t for t in TARGETS if not options.modules or t.name in options.modules]
    if options.only:
        chosen = [replace(t, functions=options.only) for t in chosen]
    rows = []
    # One wire server for every test session of every mutant (each session uses its own database).
    from app.embedded import EmbeddedMongo

    with EmbeddedMongo(":memory:", test_commands=True) as server:
        os.environ["MOZAIKS_TEST_MONGO_URI"] = server.uri
        for target in chosen:
            rows.append(report(target, *run(target, options.children, options.fresh)))
    print("\nmodule            killed/total  ratio")
    for target, killed, total, ratio in rows:
        print(f"{target.name:<17} {killed:>5}/{total:<6}  {ratio}")
    print(f"survivors' diffs: {WORK}/<module>/survivors.txt")
    return 0 if all(total for _, _, total, _ in rows) else 1


def report(
    target: Target, killed: int, total: int, survivors: list[str], seconds: float
) -> tuple[Target, int, int, str]:
    ratio = f"{100 * killed / total:.0f} %" if total else "n/a"
    print(f"   {target.name}: {killed}/{total} killed ({ratio}) in {seconds / 60:.1f} min", flush=True)
    for survivor in survivors:
        print(f"   survived: {survivor}", flush=True)
    return target, killed, total, ratio


if __name__ == "__main__":
    sys.exit(main())
