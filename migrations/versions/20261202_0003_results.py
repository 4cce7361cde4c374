"""Results out: job kinds (adapt | predict), model names/versions/tags, digests and the ONNX export.

Revision ID: 0003_results
Revises: 0002
Create Date: 2026-12-02 04:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0003_results'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kind', sa.String(length=16), server_default='adapt', nullable=False))
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
    with op.batch_alter_table('adapted_models', schema=None) as batch_op:
        batch_op.drop_constraint('uq_models_tenant_name_version', type_='unique')
        for col in ('onnx_size_bytes', 'onnx_sha256', 'onnx_key', 'sha256', 'tags', 'version', 'name'):
            batch_op.drop_column(col)
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('kind')
