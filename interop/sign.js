// Signs webhook payloads with the real sender libraries, for sturdy's interop tests.
//
// Reads a JSON array of cases on standard input and prints a JSON array of header values, one
// per case, in order:
//   {"scheme":"standard","secret":"whsec_...","id":"msg_...","timestamp":1700000000,"payload":"..."}
//     -> the `webhook-signature` value from the `standardwebhooks` package (Webhook#sign)
//   {"scheme":"stripe","secret":"whsec_...","timestamp":1700000000,"payload":"..."}
//     -> the `Stripe-Signature` value from the `stripe` package
//        (stripe.webhooks.generateTestHeaderString)
'use strict';

const { Webhook } = require('standardwebhooks');
const stripe = require('stripe')('sk_test_interop_signer_never_used_online');

function sign(c) {
  switch (c.scheme) {
    case 'standard':
      return new Webhook(c.secret).sign(c.id, new Date(c.timestamp * 1000), c.payload);
    case 'stripe':
      return stripe.webhooks.generateTestHeaderString({
        payload: c.payload,
        secret: c.secret,
        timestamp: c.timestamp,
      });
    default:
      throw new Error(`unknown scheme ${JSON.stringify(c.scheme)}`);
  }
}

let input = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (d) => {
  input += d;
});
process.stdin.on('end', () => {
  const cases = JSON.parse(input);
  process.stdout.write(JSON.stringify(cases.map(sign)));
});
