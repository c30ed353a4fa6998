"""One ``APIRouter`` per resource. A new resource is a module here with a ``router`` that
``api_shim.app.create_app`` includes; protected routes take ``deps.CurrentKey``."""
