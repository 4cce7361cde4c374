"""HTTP edge of the MUST service (FastAPI). Start with ``uvicorn api.main:create_app --factory``."""
