"""One trio task per concern, each `async def run(..., task_status)` that reports ready once serving."""
