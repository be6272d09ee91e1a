"""The node worker: one long-lived process per machine that loads the base model once and trains
the tasks a Flower ClientApp hands it, round after round (`flexlora node serve`).

Flower 1.41 starts a fresh `flwr-clientapp` process for every Message; without a worker each of
them imports torch, transformers and PEFT and loads the base model before it trains. With a
worker (node config `worker-socket`), the ClientApp only forwards the task's records over a
local channel and returns the worker's reply; it imports neither torch nor transformers.

- channel.py: the local channel, stdlib + numpy + safetensors only (what the ClientApp imports):
  a Unix-domain socket, mode 0600 in a folder only its user can enter; length-prefixed frames of
  a JSON header and safetensors bytes (never pickle); Flower records <-> frames.
- worker.py: the worker (torch side): loads the model, checks each task's base model against
  its own, trains with the same `client.train_client` as every engine, one task at a time.

Nothing is imported here but flwr, so that `import flexlora.engines.node.channel` stays
torch-free; flwr is an extra (flexlora[flower]): a missing one is one line naming it.
"""

try:
    import flwr  # noqa: F401
except ModuleNotFoundError:
    from flexlora.extras import missing

    raise missing("flwr", "the node worker (a Flower deployment)") from None
