// The hand-written Node `ws` hub many teams start with: the baseline herald-bench compares against.
// POST /pub?id=U -> every socket at /sub/U; POST /broadcast -> every socket. PORT from the env.
'use strict';
const http = require('http');
const { WebSocketServer } = require('ws');

const channels = new Map(); // user -> Set<WebSocket>
const everyone = new Set();
const wss = new WebSocketServer({ noServer: true });

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://hub');
  const targets = url.pathname === '/pub' ? channels.get(url.searchParams.get('id')) || new Set()
    : url.pathname === '/broadcast' ? everyone : null;
  if (req.method !== 'POST' || !targets) return res.writeHead(404).end();
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    const body = Buffer.concat(chunks).toString();
    for (const ws of targets) ws.send(body);
    res.writeHead(202, { 'content-type': 'application/json' }).end(`{"delivered":${targets.size}}`);
  });
});

server.on('upgrade', (req, socket, head) => {
  const m = /^\/sub\/(\w+)$/.exec(new URL(req.url, 'http://hub').pathname);
  if (!m) return socket.destroy();
  wss.handleUpgrade(req, socket, head, (ws) => {
    const set = channels.get(m[1]) || channels.set(m[1], new Set()).get(m[1]);
    set.add(ws); everyone.add(ws); ws.alive = true;
    ws.on('pong', () => { ws.alive = true; });
    ws.on('close', () => { set.delete(ws); everyone.delete(ws); if (!set.size) channels.delete(m[1]); });
  });
});

// Heartbeat as in the ws README: ping every 10 s, drop a socket that missed the last pong.
setInterval(() => everyone.forEach((ws) => (ws.alive ? ((ws.alive = false), ws.ping()) : ws.terminate())), 10000);
server.listen(Number(process.env.PORT || 8082), '127.0.0.1', () => console.log(`listening on 127.0.0.1:${server.address().port}`));
