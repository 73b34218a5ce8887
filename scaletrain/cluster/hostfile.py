"""DeepSpeed hostfiles: parse, validate, filter (`--include`/`--exclude`), write.

The format is DeepSpeed's own, so a file that passes here also works with `deepspeed --hostfile`:

    # comment
    worker-0 slots=8      # trailing comments are fine
    worker-1 slots=8

We are stricter than DeepSpeed where it would start a broken job: zero slots, a duplicate host or a
malformed line stop here with the line number and the fix, instead of a traceback from the runner.
Filters use DeepSpeed's syntax, NODE[:SLOT[,SLOT...]][@NODE...], e.g. `worker-0@worker-1:0,2`.

Checked by `scaletrain plan --hostfile H [--include F | --exclude F]` and by the SLURM batch scripts
(`python -m scaletrain.cluster.hostfile H`, one `error:` line and exit 2 when the file is bad). DeepSpeed's
own `deepspeed --hostfile` parses the file itself and does not come through here.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import OrderedDict
from pathlib import Path

from scaletrain.errors import UserError

# host, then `slots=N` (no spaces around `=`: DeepSpeed's own parser needs it so), then optionally a comment.
# The host may not contain `#`, `=`, `@`, `:` or `,`: separators in the hostfile or in --include/--exclude.
_LINE = re.compile(r"^(?P<host>[^\s#=@:,]+)\s+slots=(?P<slots>[+-]?\d+)\s*(?:#.*)?$")

FIX = "write one `HOST slots=N` per line (N >= 1), e.g. `worker-0 slots=8`"


def parse_hostfile(text: str, source: str = "hostfile") -> "OrderedDict[str, int]":
    """Host -> number of slots (ranks/GPUs on that host), in file order (= node rank order).

    `source` names the file in error messages.
    """
    hosts: OrderedDict[str, int] = OrderedDict()
    first_seen: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None:
            raise UserError(f"{source}:{lineno}: cannot parse {line!r}; {FIX}")
        host, slots = m["host"], int(m["slots"])
        if m["slots"].startswith("+"):  # DeepSpeed's own parser refuses a sign
            raise UserError(f"{source}:{lineno}: write slots={slots}, without the '+' (deepspeed --hostfile refuses it)")
        if slots > 4096:  # no node has that many accelerators; the count would overflow later (ranks lists)
            raise UserError(f"{source}:{lineno}: host {host} has slots={slots}; a host's slots are its GPUs (or CPU ranks), "
                            "at most 4096")
        if slots < 1:
            raise UserError(f"{source}:{lineno}: host {host} has slots={slots}; slots must be >= 1 "
                            f"(remove the line to leave the host out)")
        if host in hosts:
            raise UserError(f"{source}:{lineno}: host {host} is listed again (first on line {first_seen[host]}); "
                            f"keep one line per host with the total slots")
        hosts[host] = slots
        first_seen[host] = lineno
    if not hosts:
        raise UserError(f"{source}: no hosts found; {FIX}")
    return hosts


def read_hostfile(path: str | Path) -> "OrderedDict[str, int]":
    p = Path(path).expanduser()
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise UserError(f"hostfile {p} not found; create it (see hostfile.example)") from None
    except OSError as e:
        raise UserError(f"cannot read hostfile {p}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"hostfile {p} is not UTF-8 text; {FIX}") from None
    return parse_hostfile(text, source=str(p))


def format_hostfile(hosts: "dict[str, int] | list[str]", slots: int | None = None) -> str:
    """Hostfile text for {host: slots}, or for a list of hosts with `slots` each."""
    if not isinstance(hosts, dict):
        if slots is None:
            raise ValueError("format_hostfile(list) needs slots")
        hosts = {h: slots for h in hosts}
    return "".join(f"{h} slots={n}\n" for h, n in hosts.items())


def _parse_filter(spec: str, hosts: "dict[str, int]", flag: str) -> "OrderedDict[str, list[int]]":
    """`a@b:0,2` -> {a: [], b: [0, 2]} ([] = the whole host), checked against `hosts`."""
    out: OrderedDict[str, list[int]] = OrderedDict()
    for part in spec.split("@"):
        part = part.strip()
        if not part:
            raise UserError(f"{flag} {spec!r} has an empty entry; separate hosts with a single '@', "
                            f"e.g. worker-0@worker-1:0,2")
        host, colon, slot_text = part.partition(":")
        if host not in hosts:
            raise UserError(f"{flag}: unknown host {host!r}; the hostfile has {', '.join(hosts)}")
        if colon and not slot_text.strip():  # DeepSpeed's parser raises a ValueError traceback on `host:`
            raise UserError(f"{flag}: {part!r} has ':' but no slot; write {host}:0,1 for slots or {host} for the whole host")
        slots: list[int] = []
        if slot_text:
            for s in slot_text.split(","):
                if not s.strip().isdigit():
                    raise UserError(f"{flag}: slot {s!r} on host {host} is not a number; "
                                    f"write HOST:0,1 with slot indices")
                i = int(s)
                if i >= hosts[host]:
                    raise UserError(f"{flag}: host {host} has slots 0..{hosts[host] - 1}, not {i}")
                slots.append(i)
        out[host] = sorted(set(out.get(host, []) + slots))  # as DeepSpeed merges a host named twice: the slots
        # named anywhere ([] = the whole host only when no mention names a slot)
    return out


def resolve_filters(hosts: "dict[str, int]", include: str = "", exclude: str = "") -> "OrderedDict[str, list[int]]":
    """Apply DeepSpeed's --include/--exclude to a parsed hostfile.

    Returns host -> slot indices that stay active, in hostfile order; hosts left with no slot are dropped.
    """
    if include and exclude:
        raise UserError("--include and --exclude cannot be used together; pick one")
    active = OrderedDict((h, list(range(n))) for h, n in hosts.items())
    if include:
        wanted = _parse_filter(include, hosts, "--include")
        active = OrderedDict((h, wanted[h] or s) for h, s in active.items() if h in wanted)
    elif exclude:
        dropped = _parse_filter(exclude, hosts, "--exclude")
        for h, slots in dropped.items():
            active[h] = [] if not slots else [s for s in active[h] if s not in slots]
        active = OrderedDict((h, s) for h, s in active.items() if s)
    if not active:
        raise UserError(f"--exclude {exclude!r} leaves no host to run on; exclude fewer hosts")
    return active


def main(argv: "list[str] | None" = None) -> int:
    """`python -m scaletrain.cluster.hostfile FILE [--include F | --exclude F]`: check, print the active slots."""
    p = argparse.ArgumentParser(prog="python -m scaletrain.cluster.hostfile", description=main.__doc__)
    p.add_argument("hostfile")
    p.add_argument("--include", default="")
    p.add_argument("--exclude", default="")
    args = p.parse_args(argv)
    try:
        active = resolve_filters(read_hostfile(args.hostfile), args.include, args.exclude)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(" ".join(f"{h}:{','.join(map(str, s))}" for h, s in active.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
