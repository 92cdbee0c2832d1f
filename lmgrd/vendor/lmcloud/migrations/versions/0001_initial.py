"""The first schema: customers, activations, events, nonces.

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "customers",
        sa.Column("customer_id", sa.String(32), primary_key=True),
        sa.Column("license_text", sa.Text, nullable=False),
        sa.Column("customer", sa.Text, nullable=False),
        sa.Column("license_type", sa.String(8), nullable=False),
        sa.Column("issued_at", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=True),
        sa.Column("cloud_url", sa.Text, nullable=True),
        sa.Column("registered_at", sa.BigInteger, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("active_activation_id", sa.Integer, nullable=True),
        sa.Column("revoked_at", sa.BigInteger, nullable=True),
        sa.Column("revoke_reason", sa.Text, nullable=True),
        sa.Column("replaced_by", sa.String(32), nullable=True),
    )
    op.create_table(
        "activations",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("customer_id", sa.String(32), sa.ForeignKey("customers.customer_id"), nullable=False),
        sa.Column("hostname", sa.Text, nullable=False),
        sa.Column("addresses", sa.Text, nullable=False),
        sa.Column("fp_host", sa.String(64), nullable=False),
        sa.Column("fp_machine", sa.String(64), nullable=False),
        sa.Column("fp_macs", sa.Text, nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("installation_key", sa.String(44), nullable=False),
        sa.Column("how", sa.String(16), nullable=False),
        sa.Column("activated_at", sa.BigInteger, nullable=False),
        sa.Column("last_check_in", sa.BigInteger, nullable=True),
        sa.Column("cert_issued_at", sa.BigInteger, nullable=False),
        sa.Column("valid_until", sa.BigInteger, nullable=True),
        sa.Column("next_check_in", sa.BigInteger, nullable=True),
        sa.Column("token", sa.String(86), nullable=True),
        sa.Column("sequence", sa.BigInteger, nullable=False),
        sa.Column("request_nonce", sa.String(86), nullable=False),
        sa.Column("prev_token", sa.String(86), nullable=True),
        sa.Column("rotated_at", sa.BigInteger, nullable=True),
        sa.Column("retried", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("retry_streak", sa.Integer, nullable=False, server_default="0"),
        sa.Column("ended_at", sa.BigInteger, nullable=True),
        sa.Column("ended_reason", sa.Text, nullable=True),
    )
    op.create_index("ix_activations_customer_id", "activations", ["customer_id"])
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("customer_id", sa.String(32), sa.ForeignKey("customers.customer_id"), nullable=False),
        sa.Column("at", sa.BigInteger, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("hostname", sa.Text, nullable=True),
        sa.Column("detail", sa.Text, nullable=False),
    )
    op.create_index("ix_events_customer_id", "events", ["customer_id"])
    op.create_table(
        "nonces",
        sa.Column("nonce", sa.String(86), primary_key=True),
        sa.Column("customer_id", sa.String(32), nullable=False),
        sa.Column("seen_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_nonces_seen_at", "nonces", ["seen_at"])


def downgrade() -> None:
    op.drop_table("nonces")
    op.drop_table("events")
    op.drop_table("activations")
    op.drop_table("customers")
