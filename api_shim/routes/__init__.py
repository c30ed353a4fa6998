"""One ``APIRouter`` per resource; ``api_shim.app.create_app`` includes each module's ``router``.

A new resource is a module here, e.g.::

    router = APIRouter(tags=["events"], responses=PROTECTED_RESPONSES)

    @router.get("/jobs/{job_id}/events", responses=NOT_FOUND)
    async def job_events(job_id: str, shim: ShimDep, caller: CurrentKey) -> ...:
        rec = existing_job(shim.store, job_id, caller)  # 404 for an unknown job or another key's
        ...

``CurrentKey`` (``api_shim.deps``) is the one authentication rule: every protected route takes
it. Errors are raised as ``ApiError(status, code, detail)`` and answer problem+json.
"""
