// Verifies callbacks with the npm `standardwebhooks` package, as a Node.js backend would.
// argv[2]: the folder whose node_modules holds the package. One JSON line per event on stdin:
//   {"body": "<raw body>", "headers": {...}, "secrets": {"<name>": "whsec_..."}}
// answers one JSON line: {"<name>": true | false} (verified with that secret or not).
const { Webhook } = require(require.resolve("standardwebhooks", { paths: [process.argv[2]] }));
const readline = require("readline");

readline.createInterface({ input: process.stdin }).on("line", (line) => {
  const msg = JSON.parse(line);
  const out = {};
  for (const [name, secret] of Object.entries(msg.secrets)) {
    try {
      new Webhook(secret).verify(msg.body, msg.headers);
      out[name] = true;
    } catch (e) {
      out[name] = false;
    }
  }
  process.stdout.write(JSON.stringify(out) + "\n");
});
