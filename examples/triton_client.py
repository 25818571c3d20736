"""Stream a chat answer from a llama-serve'd model, over gRPC (tritonclient) and over HTTP server-sent events.

  llama-serve repo            # prints the http and grpc endpoints
  python examples/triton_client.py --http http://127.0.0.1:8000 --grpc 127.0.0.1:8001 "What is a tuple?"

The question is put in the Llama-2 chat format of one user turn (`[INST] ... [/INST]`, BOS added by the model);
for several turns and a system prompt use the OpenAI endpoint (llama-serve --openai PORT), which applies the
whole template.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys

import httpx


def chat_text(question: str) -> str:
    return f"[INST] {question.strip()} [/INST]"


def stream_grpc(url: str, model: str, question: str, max_tokens: int):
    """Yield the answer's pieces as the server sends them (gRPC bidirectional streaming)."""
    import tritonclient.grpc as grpcclient

    from llama_export.runtime.serving.client import infer_inputs, is_final

    client = grpcclient.InferenceServerClient(url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    answered = False
    try:
        client.async_stream_infer(model, infer_inputs(grpcclient, text_input=chat_text(question),
                                                      max_tokens=max_tokens, stream=True),
                                  enable_empty_final_response=True)
        while not answered:
            result, error = responses.get(timeout=300)
            if error is not None:
                answered = True  # an error is the request's final response
                raise RuntimeError(str(error))
            answered = is_final(result)
            text = result.as_numpy("text_output")
            if text is not None:
                yield text[0].decode("utf-8")
    finally:
        # leaving early (Ctrl-C) cancels the request: its slot is freed within one step. A stream whose final
        # response came is closed, never cancelled: tritonserver 2.51 can keep a stream cancelled after its final
        # response open for good, and then cannot stop (docs/serving.md, "Stopping")
        client.stop_stream(cancel_requests=not answered)
        client.close()


def stream_http(url: str, model: str, question: str, max_tokens: int):
    """Yield the answer's pieces from Triton's generate_stream (server-sent events, one `data:` per piece)."""
    body = {"text_input": chat_text(question), "max_tokens": max_tokens, "stream": True}
    with httpx.stream("POST", f"{url}/v2/models/{model}/generate_stream", json=body, timeout=300) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    raise RuntimeError(event["error"])
                yield event["text_output"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("question")
    ap.add_argument("--http", help="Triton's HTTP endpoint, e.g. http://127.0.0.1:8000")
    ap.add_argument("--grpc", help="Triton's gRPC endpoint, e.g. 127.0.0.1:8001")
    ap.add_argument("--model", default="llama")
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    if not args.http and not args.grpc:
        ap.error("give --http and/or --grpc (llama-serve prints both)")
    for name, url, stream in [("gRPC", args.grpc, stream_grpc), ("HTTP SSE", args.http, stream_http)]:
        if url:
            print(f"--- {name} ({url})")
            for piece in stream(url, args.model, args.question, args.max_tokens):
                print(piece, end="", flush=True)
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
