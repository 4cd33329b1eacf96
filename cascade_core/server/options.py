"""The command-line options of `serve` (and `route`'s `--max-new-tokens`), checked before any model loads.

Every value here can be checked without a model, so a typo costs a one-line error in a second,
not a traceback after a 20 s model load (issue 23: `serve --port 99999` failed with an
OverflowError only once the weights were in memory). The CLI calls these first; the messages
name the flag.
"""

from __future__ import annotations

import math

from cascade_core.server.common import check_bind_host, is_loopback, read_token
from cascade_core.server.openai_request import LINE_BREAK, MAX_NEW_TOKENS


def check_max_new_tokens(value: int, flag: str = "--max-new-tokens") -> None:
    """1..MAX_NEW_TOKENS, as the servers accept in `max_tokens`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_NEW_TOKENS:
        raise ValueError(f"{flag} must be a whole number from 1 to {MAX_NEW_TOKENS}, got {value!r}")


def check_route_args(args) -> None:
    """`route`'s options that need no model: --max-new-tokens in range, every option and the
    subject on one line (a line break in an option would put a second "B." line in the prompt,
    as the servers refuse too)."""
    check_max_new_tokens(args.max_new_tokens)
    for i, option in enumerate(args.options or ()):
        if LINE_BREAK.search(option):
            raise ValueError(f"--options: option {i + 1} ({option[:20]!r}) holds a line break: an option is one line")
    if args.subject and LINE_BREAK.search(args.subject):
        raise ValueError("--subject holds a line break: it is one line of the prompt's header")


def check_serve_args(args) -> None:
    """Refuse bad `serve` options (an argparse Namespace) with a message naming the flag.

    Checked: the bind address (loopback unless --allow-remote, and a reachable server must have a
    --token-env), the port (1..65535), the token variable is set, the limits are positive, the
    timeout finite, --max-new-tokens in range, --threads >= 1, the shutdown grace and header timeout.
    """
    check_bind_host(args.host, args.allow_remote)
    if not is_loopback(args.host) and not args.token_env:
        raise ValueError(f"--host {args.host} with --allow-remote needs --token-env NAME: a server other machines "
                         "can reach must require a bearer token")
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be from 1 to 65535, got {args.port}")
    for name in ("max_body_bytes", "max_prompt_chars", "max_in_flight"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not (math.isfinite(args.timeout_s) and args.timeout_s > 0):
        raise ValueError(f"--timeout-s must be a finite number of seconds > 0, got {args.timeout_s}")
    check_max_new_tokens(args.max_new_tokens)
    grace, header = getattr(args, "grace_s", 10.0), getattr(args, "header_timeout_s", 10.0)
    if not (math.isfinite(grace) and grace >= 0):
        raise ValueError(f"--grace-s must be a finite number of seconds >= 0, got {grace}")
    if not (math.isfinite(header) and header > 0):
        raise ValueError(f"--header-timeout-s must be a finite number of seconds > 0, got {header}")
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    read_token(args.token_env)  # named but unset: refused now, not after the model load


def check_policy_args(args) -> None:
    """`--policy FILE` (route, serve): a file, and neither with `--thresholds preset` (which asks for
    the preset's own thresholds) nor with `--stages` (a policy file certifies the whole cascade)."""
    policy = getattr(args, "policy", None)
    if policy is None:
        return
    from pathlib import Path

    if not Path(policy).is_file():
        raise ValueError(f"--policy {policy}: no such file (a policy file `calibrate` wrote)")
    if args.thresholds == "preset":
        raise ValueError("--policy FILE and --thresholds preset ask for two different thresholds; give one")
    if getattr(args, "stages", None):
        raise ValueError("--policy FILE certifies the whole cascade; drop --stages")


def resolve_policies(preset, args, multiple_choice: bool | None = None) -> dict:
    """Each kind's policy for `route`/`serve` (`compose.live.cascade_policies`) from --dataset,
    --policy, --thresholds and --stages, before any model loads. `multiple_choice`: `route`'s
    question's kind, which must be its --dataset's."""
    from cascade_core.compose.live import cascade_policies
    from cascade_core.compose.policies import dataset_is, dataset_multiple_choice

    check_policy_args(args)
    dataset = getattr(args, "dataset", None)
    if dataset is not None:
        try:
            dataset = dataset_is(dataset)
        except ValueError as err:
            raise ValueError(f"--dataset: {err}") from None
        if multiple_choice is not None and dataset_multiple_choice(dataset) != multiple_choice:
            holds = "multiple-choice" if dataset_multiple_choice(dataset) else "free-form"
            raise ValueError(f"--dataset {dataset} holds {holds} questions, and this question is "
                             f"{'multiple choice (--options)' if multiple_choice else 'free-form (no --options)'}")
    return cascade_policies(preset, getattr(args, "stages", None), args.thresholds, dataset=dataset,
                            policy_file=getattr(args, "policy", None))
