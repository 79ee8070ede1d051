"""The sidecar, `phoenix sync`: one sync pass pushes every complete local checkpoint and prunes the Hub;
the loop runs a pass every HF_SYNC_INTERVAL s, at once when the trainer stops, and a final push at SIGTERM."""
