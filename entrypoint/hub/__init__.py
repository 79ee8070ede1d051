"""The Hugging Face Hub as phoenix uses it: config, the client and its call/retry layer, the checkpoint store
interface with its git-repo and Storage Bucket stores, the generation claim, and restore."""
