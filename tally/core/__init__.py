"""The domain: ids, counters, events and the pure logic over them. No I/O lives here."""
