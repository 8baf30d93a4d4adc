"""The state tables, both changelog-backed and keyed like the per-customer inputs:

- customers: customer key -> CustomerState JSON;
- identity: key -> IdentityEntry JSON (`triggers.linking`): a device's link, a
  customer's anonymous ids and hashes, an email or phone hash's owner.
"""

from __future__ import annotations

import faust
from faust.types import TableT

CUSTOMERS_TABLE = "customers"
IDENTITY_TABLE = "identity"


def declare_customer_table(app: faust.App, partitions: int) -> TableT[bytes, bytes]:
    # Raw bytes both ways: keys are the customer key as produced on the input
    # topic, and pydantic (de)serializes the state faster than faust's codecs.
    return app.Table(
        CUSTOMERS_TABLE,
        # bytes types select faust's raw codec for the store and the changelog.
        key_type=bytes,
        value_type=bytes,
        partitions=partitions,
        help="Per-customer state: contact points, consents, carts, journeys",
    )


def declare_identity_table(app: faust.App, partitions: int) -> TableT[bytes, bytes]:
    # Written by the customers agent beside the state, in the input's partition: a
    # key's entry and its state are owned, recovered and moved together.
    return app.Table(
        IDENTITY_TABLE,
        key_type=bytes,
        value_type=bytes,
        partitions=partitions,
        help="Identity map entries: device links, customers' ids, email/phone owners",
    )
