// herald.js in a real headless Chromium against the real `herald` binary:
// delivery, tabs and users, a server restart, a silently dead connection, token refresh.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import {
  API_KEY,
  SOON,
  launchBrowser,
  mintToken,
  openTestPage,
  pageLog,
  publish,
  range,
  sleep,
  socketStats,
  startHerald,
  startProxy,
  subscribe,
  tempDir,
  waitFor,
  waitForNotifications,
} from './harness.js';

const TEST_TIMEOUT = 180_000;
// Short backoff so reconnect tests do not idle; the full-jitter logic is the same.
const FAST_BACKOFF = { initialMs: 200, maxMs: 2000, stableMs: 5000 };

let browser;
before(async () => {
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
});

/** Every seq exactly once, in order, and never two sockets at once. */
async function assertExactlyOnce(page, expected) {
  const seqs = (await pageLog(page)).notifications.map((n) => n.seq);
  assert.deepEqual(seqs, expected, 'every notification exactly once, in order');
  const sockets = await socketStats(page);
  assert.equal(sockets.maxLive, 1, `never two sockets at once (${JSON.stringify(sockets)})`);
}

test('a page subscribes and receives notifications published over HTTP', { timeout: TEST_TIMEOUT }, async () => {
  const herald = await startHerald();
  try {
    const page = await openTestPage(browser.context, herald.base);
    const token = await mintToken(herald.base, 'alice');
    await subscribe(page, { user: 'alice', token });

    for (const n of range(1, 3)) {
      const answer = await publish(herald.base, 'alice', { event: 'order.shipped', data: { order: n } });
      assert.equal(answer.seq, n);
    }
    await waitForNotifications(page, 3);
    const log = await pageLog(page);
    assert.deepEqual(
      log.notifications.map((n) => [n.seq, n.event, n.data.order]),
      [[1, 'order.shipped', 1], [2, 'order.shipped', 2], [3, 'order.shipped', 3]],
    );
    assert.equal(await page.evaluate(() => window.herald.lastSeq), 3);
    assert.deepEqual(log.gaps, []);
    assert.deepEqual(log.errors, []);
    await page.close();
  } finally {
    await herald.stop();
  }
});

test('two tabs of one user both receive; another user\'s tab receives nothing', { timeout: TEST_TIMEOUT }, async () => {
  const herald = await startHerald();
  try {
    const tabs = {};
    for (const [name, user] of [['alice1', 'alice'], ['alice2', 'alice'], ['bob', 'bob']]) {
      tabs[name] = await openTestPage(browser.context, herald.base);
      await subscribe(tabs[name], { user, token: await mintToken(herald.base, user) });
    }
    for (const n of range(1, 4)) {
      await publish(herald.base, 'alice', { event: 'chat', data: { text: `for alice ${n}` } });
    }
    for (const tab of [tabs.alice1, tabs.alice2]) {
      assert.deepEqual(await waitForNotifications(tab, 4), range(1, 4));
    }
    // Bob's tab is live (it gets his own notification) and got nothing of Alice's.
    await publish(herald.base, 'bob', { event: 'chat', data: { text: 'for bob' } });
    await waitForNotifications(tabs.bob, 1);
    await sleep(500);
    const bob = await pageLog(tabs.bob);
    assert.deepEqual(bob.notifications.map((n) => n.data.text), ['for bob']);
    for (const tab of Object.values(tabs)) await tab.close();
  } finally {
    await herald.stop();
  }
});

test('Herald restarts mid-stream: the page reconnects by itself, every notification exactly once, in order', { timeout: TEST_TIMEOUT }, async () => {
  const store = tempDir('restart');
  let herald = await startHerald({ store });
  const port = herald.port;
  try {
    const page = await openTestPage(browser.context, herald.base);
    await subscribe(page, { user: 'carol', token: await mintToken(herald.base, 'carol'), backoff: FAST_BACKOFF });

    for (const n of range(1, 5)) await publish(herald.base, 'carol', { data: { n } });
    await waitForNotifications(page, 5);

    // SIGTERM: sessions are closed with 1001; then the same store on the same port.
    await herald.stop();
    await waitFor(page, () => window.herald.state !== 'open');
    herald = await startHerald({ store, bind: `127.0.0.1:${port}` });
    // Published while the page is still reconnecting: it must come through the resume.
    for (const n of range(6, 10)) await publish(herald.base, 'carol', { data: { n } });
    await waitForNotifications(page, 10);
    for (const n of range(11, 12)) await publish(herald.base, 'carol', { data: { n } });
    await waitForNotifications(page, 12);
    await sleep(500);

    await assertExactlyOnce(page, range(1, 12));
    const log = await pageLog(page);
    assert.deepEqual(log.notifications.map((n) => n.data.n), range(1, 12));
    assert.ok(
      log.states.some((s) => s.state === 'reconnecting' && s.code === 1001),
      `saw the server's 1001 close: ${JSON.stringify(log.states)}`,
    );
    assert.equal(log.states.at(-1).state, 'open');
    assert.deepEqual(log.gaps, []);
    await page.close();
  } finally {
    await herald.stop();
  }
});

test('a connection cut without a close: the heartbeat notices, the client reconnects, nothing is lost', { timeout: TEST_TIMEOUT }, async () => {
  const herald = await startHerald();
  const proxy = await startProxy(herald.port);
  try {
    const page = await openTestPage(browser.context, herald.base);
    await subscribe(page, {
      user: 'dave',
      url: `http://127.0.0.1:${proxy.port}`,
      token: await mintToken(herald.base, 'dave'),
      backoff: FAST_BACKOFF,
    });
    for (const n of range(1, 3)) await publish(herald.base, 'dave', { data: { n } });
    await waitForNotifications(page, 3);

    // Nothing is forwarded any more, and nothing is closed: the socket looks open to both ends.
    proxy.freeze();
    for (const n of range(4, 6)) await publish(herald.base, 'dave', { data: { n } });
    // The client's ping goes unanswered; it declares the socket dead (timeout 4 s from hello).
    await waitFor(page, () => window.log.states.some((s) => s.reason === 'heartbeat_timeout'));
    await waitFor(page, () => window.herald.state === 'open');
    await waitForNotifications(page, 6);
    await publish(herald.base, 'dave', { data: { n: 7 } });
    await waitForNotifications(page, 7);
    await sleep(500);

    await assertExactlyOnce(page, range(1, 7));
    const sockets = await socketStats(page);
    assert.equal(sockets.created, 2);
    assert.match(sockets.urls[1], /[?&]since=3(&|$)/, 'resumed after the last seq seen');
    await page.close();
  } finally {
    await proxy.close();
    await herald.stop();
  }
});

test('an expired token is refreshed through getToken and the subscription continues', { timeout: TEST_TIMEOUT }, async () => {
  const herald = await startHerald();
  const proxy = await startProxy(herald.port);
  try {
    let minted = 0;
    const page = await openTestPage(browser.context, herald.base, {
      getToken: async (user) => {
        minted += 1;
        return mintToken(herald.base, user, 2);
      },
    });
    await subscribe(page, {
      user: 'erin',
      url: `http://127.0.0.1:${proxy.port}`,
      refreshTokens: true,
      backoff: FAST_BACKOFF,
    });
    assert.equal(minted, 1);
    await publish(herald.base, 'erin', { data: { n: 1 } });
    await waitForNotifications(page, 1);

    // An open session outlives its token; a new upgrade needs a valid one.
    await sleep(3000);
    proxy.cut();
    await publish(herald.base, 'erin', { data: { n: 2 } });
    await waitFor(page, () => window.log.states.filter((s) => s.state === 'open').length >= 2);
    await waitForNotifications(page, 2);
    await publish(herald.base, 'erin', { data: { n: 3 } });
    await waitForNotifications(page, 3);

    await assertExactlyOnce(page, range(1, 3));
    assert.equal(minted, 2, 'getToken was called again before reconnecting');
    const log = await pageLog(page);
    assert.ok(
      !log.states.some((s) => s.reason === 'upgrade_failed'),
      `the expiry was seen in the token, not learned from a refused upgrade: ${JSON.stringify(log.states)}`,
    );
    await page.close();
  } finally {
    await proxy.close();
    await herald.stop();
  }
});

test('a refused upgrade (bad token the client cannot judge) makes the client fetch a fresh token', { timeout: TEST_TIMEOUT }, async () => {
  const herald = await startHerald();
  try {
    let minted = 0;
    const page = await openTestPage(browser.context, herald.base, {
      getToken: async (user) => {
        minted += 1;
        return mintToken(herald.base, user);
      },
    });
    await subscribe(page, {
      user: 'frank',
      token: forgedToken('frank'),
      refreshTokens: true,
      backoff: FAST_BACKOFF,
    });
    assert.equal(minted, 1);
    const log = await pageLog(page);
    assert.deepEqual(
      log.states.map((s) => s.reason ?? s.state),
      ['connecting', 'upgrade_failed', 'connecting', 'open'],
    );
    await publish(herald.base, 'frank', { data: { n: 1 } });
    await waitForNotifications(page, 1);
    await assertExactlyOnce(page, [1]);
    await page.close();
  } finally {
    await herald.stop();
  }
});

test('coming back online or becoming visible reconnects at once instead of waiting out the backoff', { timeout: TEST_TIMEOUT }, async () => {
  const herald = await startHerald();
  const proxy = await startProxy(herald.port);
  try {
    const page = await openTestPage(browser.context, herald.base);
    // A backoff far longer than the test's patience; full jitter pinned near its top.
    await page.evaluate(() => {
      Math.random = () => 0.99;
    });
    await subscribe(page, {
      user: 'hana',
      url: `http://127.0.0.1:${proxy.port}`,
      token: await mintToken(herald.base, 'hana'),
      backoff: { initialMs: 600_000, maxMs: 600_000 },
    });
    let published = 0;
    for (const [why, wake] of [
      ['online', () => browser.context.setOffline(true).then(() => browser.context.setOffline(false))],
      ['visible', () => page.evaluate(() => document.dispatchEvent(new Event('visibilitychange')))],
    ]) {
      proxy.cut();
      await waitFor(page, () => window.herald.state === 'reconnecting');
      await publish(herald.base, 'hana', { data: { n: ++published } });
      await sleep(300);
      assert.equal(await page.evaluate(() => window.herald.state), 'reconnecting', `still waiting before ${why}`);
      await wake();
      await waitFor(page, () => window.herald.state === 'open');
      await waitForNotifications(page, published);
    }
    await assertExactlyOnce(page, [1, 2]);
    await page.close();
  } finally {
    await proxy.close();
    await herald.stop();
  }
});

test('close() stops the client for good', { timeout: TEST_TIMEOUT }, async () => {
  const herald = await startHerald();
  try {
    const page = await openTestPage(browser.context, herald.base);
    await subscribe(page, { user: 'gina', token: await mintToken(herald.base, 'gina'), backoff: FAST_BACKOFF });
    await page.evaluate(() => window.herald.close());
    await publish(herald.base, 'gina', { data: { n: 1 } });
    await sleep(1500);
    const log = await pageLog(page);
    assert.equal(log.notifications.length, 0);
    assert.equal(log.states.at(-1).state, 'closed');
    assert.equal((await socketStats(page)).live, 0);
    // The server saw the close: the user's presence drops to no session.
    const deadline = Date.now() + SOON;
    let sessions;
    do {
      const presence = await fetch(`${herald.base}/v1/users/gina/presence`, {
        headers: { authorization: `Bearer ${API_KEY}` },
      }).then((r) => r.json());
      sessions = presence.sessions;
    } while (sessions !== 0 && Date.now() < deadline && (await sleep(100), true));
    assert.equal(sessions, 0);
    await page.close();
  } finally {
    await herald.stop();
  }
});

/** A well-formed token with a far `exp`, signed with the wrong secret: only the server can tell. */
function forgedToken(user) {
  const encode = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const claims = { sub: user, iat: Math.floor(Date.now() / 1000), exp: Math.floor(Date.now() / 1000) + 3600 };
  const unsigned = `${encode({ alg: 'HS256', typ: 'JWT' })}.${encode(claims)}`;
  return `${unsigned}.${Buffer.from('not the secret').toString('base64url')}`;
}
