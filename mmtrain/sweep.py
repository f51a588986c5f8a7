"""``mmtrain sweep`` (being written this session)."""

import argparse


def add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="(in progress)")
    p.set_defaults(handler=lambda args: 2)
