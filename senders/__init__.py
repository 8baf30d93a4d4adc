"""Channel senders: deliver actions to providers, never twice and never lost.

The guarantee: every action is delivered to the provider *at least once*, always with
the same idempotency key (its deterministic `action_id`), hence *exactly once* where
the provider honours the key. A sender can die after the provider accepted an action
and before it recorded that; the action then goes out a second time with the same
key, and that is the only way it goes out twice (never with another key, never
without a `sending` lease in Redis).

- lease: the per-action `sending` lease and `sent` mark in Redis;
- retry: which failures retry, the backoff, Retry-After, the retry record;
- ratelimit: the channel's token bucket shared through Redis, with AIMD on 429;
- transports: console and webhook (one attempt each); smtp: email over SMTP;
- render: messages from Jinja2 templates; advertising: the Korean (광고) rules;
- mail_catcher: the local SMTP server `omnicue dev` writes emails to files with;
- runtime: the `omnicue send` process that ties them to Kafka.
"""
