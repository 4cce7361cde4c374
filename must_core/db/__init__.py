"""Database layer: declarative base, typed models and session factory (SQLAlchemy 2.0, sync)."""
