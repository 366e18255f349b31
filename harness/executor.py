"""Run an API-format graph through ComfyUI's real validator and executor, in-process, without a server."""
import asyncio
import time
import uuid


class _HeadlessServer:
    """The few attributes and methods PromptExecutor uses on its server; records what it is sent."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data, time.perf_counter()))

    def queue_updated(self):
        pass


class GraphError(RuntimeError):
    """The graph failed validation or execution; ``details`` holds ComfyUI's own error payload."""

    def __init__(self, message, details):
        super().__init__(message)
        self.details = details


def run_graph(prompt, extra_data=None):
    """Validate and execute ``prompt`` (API format). Returns (ui outputs by node id, executor).

    Raises GraphError with ComfyUI's message when validation fails or a node raises; the node's own
    exception text is in the message (that is what a user sees in the UI).
    """
    import execution

    prompt_id = str(uuid.uuid4())
    valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid[0]:
        raise GraphError(f"invalid prompt: {valid[1]} {valid[3]}", valid)
    server = _HeadlessServer()
    # No node cache. ComfyUI reads cache_args by key and ignores keys it does not know, so this holds
    # every key any supported version reads (0.33 added "ram_inactive", its RAM-pressure release target).
    executor = execution.PromptExecutor(server, cache_type=execution.CacheType.NONE,
                                        cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    # A client id makes ComfyUI send its per-node "executing" messages (node_timings reads them).
    executor.execute(prompt, prompt_id, {"client_id": "headless", **(extra_data or {})}, valid[2])
    if not executor.success:
        errors = [data for event, data in executor.status_messages if event == "execution_error"]
        message = errors[0].get("exception_message", "") if errors else "unknown failure"
        raise GraphError(f"graph failed: {message}", errors)
    return executor.history_result["outputs"], executor


def node_timings(executor):
    """Seconds spent per node id, from the executor's `executing` messages (node start to next start,
    the last node to the run's last message)."""
    messages = executor.server.messages
    starts = [(data.get("node"), t) for event, data, t in messages if event == "executing"]
    starts.append((None, messages[-1][2]))  # the run's last message closes the last node
    return {node: round(t_next - t, 4) for (node, t), (_, t_next) in zip(starts, starts[1:]) if node is not None}
