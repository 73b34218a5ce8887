"""One module per `scaletrain` subcommand. Each defines `add_parser(subparsers)`; handlers import heavy
libraries (torch, deepspeed) lazily so argument mistakes fail fast."""

# Order here is the order in `scaletrain --help`.
MODULES = [
    "train",
    "plan",
    "prepare_data",
    "grow",
    "import_hf",
    "export_hf",
    "eval",
    "generate",
    "lineage",
    "bench",
    "submit",
    "runs",
]
