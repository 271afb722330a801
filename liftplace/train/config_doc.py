"""``python -m liftplace.train.config_doc --markdown | --update-doc docs/TRAINER.md``: the table
of every training config key, generated from :class:`~liftplace.train.config.TrainConfig` so the
documentation cannot drift from it (``tests/test_config.py`` checks that it has not)."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, config_help_table, update_doc


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m liftplace.train.config_doc",
                                     description="The table of every training config key, for docs/TRAINER.md.")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--markdown", action="store_true", help="print the table")
    action.add_argument("--update-doc", metavar="FILE", help="rewrite the table between the markers in FILE")
    args = parser.parse_args(argv)
    if args.markdown:
        print(config_help_table())
        return 0
    try:
        changed = update_doc(args.update_doc)
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.update_doc}: {'updated' if changed else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
