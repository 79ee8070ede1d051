"""After training: `phoenix chat` (talk to the model), `phoenix eval` (CORE, ChatCORE), `phoenix export`
(publish it as a model repo) and `phoenix report` (a page and plots of the run from its files)."""
