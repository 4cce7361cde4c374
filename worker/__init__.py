"""Celery worker: runs adaptation jobs claimed from the database."""
