"""``mmtrain report`` (being written this session)."""

import argparse


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="(in progress)")
    p.set_defaults(handler=lambda args: 2)
