"""The customer state table: customer key -> CustomerState JSON (changelog-backed)."""

from __future__ import annotations

import faust
from faust.types import TableT

CUSTOMERS_TABLE = "customers"


def declare_customer_table(app: faust.App, partitions: int) -> TableT:
    # Raw bytes both ways: keys are the customer key as produced on the input
    # topic, and pydantic (de)serializes the state faster than faust's codecs.
    return app.Table(
        CUSTOMERS_TABLE,
        schema=faust.Schema(
            key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
        ),
        partitions=partitions,
        help="Per-customer state: contact points, consents, carts, journeys",
    )
