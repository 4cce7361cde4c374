"""console: job events (training curve, health), job logs, model samples (gallery).

Revision ID: 0003_console
Revises: 0002
Create Date: 2026-12-02 04:16:47.136190
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import must_core.db.base

JSON_T = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

revision: str = '0003_console'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('job_events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('job_id', sa.Uuid(), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('step', sa.Integer(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('data', JSON_T, nullable=False),
    sa.Column('created_at', must_core.db.base.UtcDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_events_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job_events')),
    sa.UniqueConstraint('job_id', 'kind', 'step', name='uq_job_events_job_kind_step')
    )
    op.create_table('job_logs',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('job_id', sa.Uuid(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('created_at', must_core.db.base.UtcDateTime(timezone=True), nullable=False),
    sa.Column('level', sa.String(length=16), nullable=False),
    sa.Column('logger', sa.String(length=200), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_logs_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job_logs'))
    )
    with op.batch_alter_table('job_logs', schema=None) as batch_op:
        batch_op.create_index('ix_job_logs_job_id_id', ['job_id', 'id'], unique=False)

    op.create_table('model_samples',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('model_id', sa.Uuid(), nullable=False),
    sa.Column('class_name', sa.String(length=200), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('score', sa.Float(), nullable=False),
    sa.Column('thumbnail', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['adapted_models.id'], name=op.f('fk_model_samples_model_id_adapted_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_model_samples'))
    )
    with op.batch_alter_table('model_samples', schema=None) as batch_op:
        batch_op.create_index('ix_model_samples_model_class_rank', ['model_id', 'class_name', 'rank'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('model_samples', schema=None) as batch_op:
        batch_op.drop_index('ix_model_samples_model_class_rank')

    op.drop_table('model_samples')
    with op.batch_alter_table('job_logs', schema=None) as batch_op:
        batch_op.drop_index('ix_job_logs_job_id_id')

    op.drop_table('job_logs')
    op.drop_table('job_events')
