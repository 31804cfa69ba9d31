"""The HTTP routes; `service.app.create_app` mounts them."""
