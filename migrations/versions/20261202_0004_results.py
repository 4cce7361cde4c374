"""Results out: job kinds (adapt | predict), model names/versions/tags, digests and the ONNX export;
webhook endpoints and the deliveries outbox.

Revision ID: 0003_results
Revises: 0003_console
Create Date: 2026-12-02 04:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0003_results'
down_revision: str | None = '0003_console'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.add_column(sa.Column('webhook_secret', sa.String(length=64), nullable=True))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kind', sa.String(length=16), server_default='adapt', nullable=False))
        batch_op.add_column(sa.Column('notified_status', sa.String(length=16), nullable=True))
        batch_op.create_index('ix_jobs_finished_at', ['finished_at'], unique=False)
    # jobs finished before webhooks existed have nothing to announce
    op.execute("UPDATE jobs SET notified_status = status WHERE status IN ('succeeded', 'failed', 'cancelled')")
    op.create_table(
        'webhook_endpoints',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('tenant_id', sa.Uuid(), nullable=False),
        sa.Column('url', sa.String(length=2048), nullable=False),
        sa.Column('secret', sa.String(length=64), nullable=False),
        sa.Column('events', _JSON, nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_webhook_endpoints_tenant_id', 'webhook_endpoints', ['tenant_id'], unique=False)
    op.create_table(
        'webhook_deliveries',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('tenant_id', sa.Uuid(), nullable=False),
        sa.Column('job_id', sa.Uuid(), nullable=True),
        sa.Column('endpoint_id', sa.Uuid(), nullable=True),
        sa.Column('url', sa.String(length=2048), nullable=False),
        sa.Column('event', sa.String(length=64), nullable=False),
        sa.Column('payload', _JSON, nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('last_status_code', sa.Integer(), nullable=True),
        sa.Column('last_error', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['endpoint_id'], ['webhook_endpoints.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_webhook_deliveries_due', 'webhook_deliveries', ['status', 'next_attempt_at'], unique=False)
    op.create_index('ix_webhook_deliveries_job_id', 'webhook_deliveries', ['job_id'], unique=False)
    op.create_index('ix_webhook_deliveries_tenant_id', 'webhook_deliveries', ['tenant_id'], unique=False)
    with op.batch_alter_table('adapted_models', schema=None) as batch_op:
        batch_op.add_column(sa.Column('name', sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column('version', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('tags', _JSON, server_default='[]', nullable=False))
        batch_op.add_column(sa.Column('sha256', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('onnx_key', sa.String(length=1024), nullable=True))
        batch_op.add_column(sa.Column('onnx_sha256', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('onnx_size_bytes', sa.BigInteger(), nullable=True))
        batch_op.create_unique_constraint('uq_models_tenant_name_version', ['tenant_id', 'name', 'version'])


def downgrade() -> None:
    op.drop_table('webhook_deliveries')
    op.drop_table('webhook_endpoints')
    with op.batch_alter_table('adapted_models', schema=None) as batch_op:
        batch_op.drop_constraint('uq_models_tenant_name_version', type_='unique')
        for col in ('onnx_size_bytes', 'onnx_sha256', 'onnx_key', 'sha256', 'tags', 'version', 'name'):
            batch_op.drop_column(col)
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_finished_at')
        batch_op.drop_column('notified_status')
        batch_op.drop_column('kind')
    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.drop_column('webhook_secret')
