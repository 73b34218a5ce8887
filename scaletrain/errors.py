"""One error type for users' mistakes: the CLI prints it as one line and exits with code 2."""

import os


class UserError(Exception):
    """A problem with what the user gave us (config, data, checkpoint, flags), not a bug.

    The message names the problem and, where possible, the fix. It is printed without a
    traceback, so it must stand on its own in one line.
    """

    exit_code = 2
    # True where another rank of the same job prints this same line (rank 0, or this host's first rank): under a
    # launcher every rank raises a config error or a collective's verdict, and N identical lines bury the one
    heard_elsewhere = False


def heard_elsewhere(error: UserError, quiet: bool = True) -> UserError:
    """`error`: the CLI prints it at once if `quiet` is False, else only after waiting up to QUIET_RANK_WAIT_S for the
    launcher to stop this rank (cli._wait_to_be_stopped; see UserError.heard_elsewhere)."""
    error.heard_elsewhere = quiet
    return error


def alike_on_this_host(error: UserError) -> UserError:
    """`error` from a check every rank of a host makes alike (same files, flags, hardware), before the ranks can
    talk: printed by the host's first rank (the others only if the launcher has not stopped them within 30 s)."""
    e = os.environ
    local = e.get("LOCAL_RANK", e.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"))
    world = e.get("WORLD_SIZE", e.get("OMPI_COMM_WORLD_SIZE", "1"))  # (LOCAL_RANK alone: no launcher started us)
    return heard_elsewhere(error, local != "0" and world.strip() not in ("", "0", "1"))


def model_error_line(error) -> str:
    """One line for the pydantic ValidationError of a model section built on its own (a growth stage, a grown
    child, an HF import): a rule across fields says itself; a field error names its `model.` key and the value."""
    e = error.errors()[0]
    if not e["loc"]:  # (heads against hidden_size, label names against num_labels)
        return e["msg"].removeprefix("Value error, ")
    return f"model.{e['loc'][0]}: {e['msg']} (got {e.get('input')!r})"


def in_flag_words(error: UserError, names: dict[str, str]) -> UserError:
    """`error` with the config keys it names (`names`' keys) written as the flags a command takes for them: the
    checks are shared with training, whose messages name config keys the command would refuse."""
    message = str(error)
    for key, flag in names.items():
        message = message.replace(key, flag)
    return UserError(message)
