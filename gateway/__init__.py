"""callgate's write side: receive, decrypt, validate, log and forward EnableX webhooks."""
