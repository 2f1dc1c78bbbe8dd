// The demo page Herald serves at `/`: it renders, connects, shows notifications live,
// and offers sending only where the server allows it.

import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, test } from 'node:test';

import { SOON, launchBrowser, mintToken, publish, screenshotDir, startHerald } from './harness.js';

const TEST_TIMEOUT = 120_000;

let browser;
before(async () => {
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
});

test('the demo page renders and shows a notification published over HTTP', { timeout: TEST_TIMEOUT }, async () => {
  const herald = await startHerald();
  try {
    const page = await browser.context.newPage();
    await page.goto(`${herald.base}/`);
    // A server with credentials: subscribing needs a token, and the page offers no sending.
    await page.locator('#mode-note', { hasText: 'requires a token' }).waitFor({ timeout: SOON });
    assert.equal(await page.locator('#send').isVisible(), false);

    await page.fill('#user', 'dana');
    await page.fill('#token', await mintToken(herald.base, 'dana'));
    await page.click('#connect-button');
    await page.locator('#state[data-state="open"]').waitFor({ timeout: SOON });

    await publish(herald.base, 'dana', { event: 'order.shipped', data: { message: 'Your order #42 has shipped' } });
    await publish(herald.base, 'dana', { event: 'invoice.paid', data: { amount: 120, currency: 'EUR' } });
    const feed = page.locator('#feed');
    await feed.locator('li', { hasText: 'invoice.paid' }).waitFor({ timeout: SOON });

    const text = await feed.innerText();
    assert.match(text, /Your order #42 has shipped/);
    assert.match(text, /order\.shipped/);
    assert.match(text, /"amount":120/);
    assert.match(await page.locator('#state').innerText(), /live as dana/);
    assert.equal(await page.locator('#count').innerText(), '(2)');

    const path = join(screenshotDir(), 'demo.png');
    const png = await page.screenshot({ path, fullPage: true });
    assert.ok(png.length > 10_000, `a real screenshot at ${path}`);
    await page.close();
  } finally {
    await herald.stop();
  }
});

test('in insecure mode the demo page sends a test notification and receives it', { timeout: TEST_TIMEOUT }, async () => {
  const herald = await startHerald({ env: { HERALD_AUTH__INSECURE: 'true' } });
  try {
    const page = await browser.context.newPage();
    await page.goto(`${herald.base}/demo?user=erin&connect`);
    await page.locator('#state[data-state="open"]').waitFor({ timeout: SOON });
    assert.equal(await page.locator('#token-field').isVisible(), false, 'no token needed');
    assert.equal(await page.locator('#send').isVisible(), true, 'sending is offered');

    await page.fill('#event', 'demo.ping');
    await page.fill('#message', 'Sent from the demo page');
    await page.click('#send button');
    await page.locator('#feed li', { hasText: 'Sent from the demo page' }).waitFor({ timeout: SOON });
    assert.match(await page.locator('#feed').innerText(), /demo\.ping/);

    await page.screenshot({ path: join(screenshotDir(), 'demo-insecure.png'), fullPage: true });
    await page.close();
  } finally {
    await herald.stop();
  }
});
