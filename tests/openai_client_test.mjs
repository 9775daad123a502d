// The official OpenAI client library (npm `openai`) against a running `meshlm serve`: models, completions,
// chat completions whole and streamed, the bearer key, and a 404 for an unknown model.
// Usage: node openai_client_test.mjs BASE_URL KEY MODEL_ID EXPECTED_GREEDY_TEXT
import OpenAI from 'openai';

const [base, key, model, expected] = process.argv.slice(2);
const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: key, maxRetries: 0, timeout: 60000 });
let pass = 0, fail = 0;
function check(what, ok, detail = '') {
  if (ok) { pass++; console.log(`openai client: ${what}`); }
  else { fail++; console.error(`openai client: FAILED: ${what} ${detail}`); }
}

const models = await client.models.list();
check('models.list names the model', models.data.some((m) => m.id === model), JSON.stringify(models.data));

const c = await client.completions.create({ model, prompt: 'Once upon a time', max_tokens: 40, temperature: 0 });
check('completions.create (greedy) = meshlm run --greedy', c.choices[0].text === expected,
      JSON.stringify([c.choices[0].text, expected]));
check('usage counts 40 tokens', c.usage.completion_tokens === 40, JSON.stringify(c.usage));

let streamed = '';
const cs = await client.completions.create({ model, prompt: 'Once upon a time', max_tokens: 40, temperature: 0, stream: true });
for await (const chunk of cs) streamed += chunk.choices[0].text ?? '';
check('completions stream adds up to the same text', streamed === expected, JSON.stringify(streamed));

const chat = await client.chat.completions.create({
  model, messages: [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'Tell me a story' }],
  max_tokens: 12, temperature: 0 });
const whole = chat.choices[0].message.content;
check('chat.completions.create answers as the assistant', chat.choices[0].message.role === 'assistant' && whole.length > 0,
      JSON.stringify(chat.choices[0]));
let pieces = '';
const st = await client.chat.completions.create({
  model, messages: [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'Tell me a story' }],
  max_tokens: 12, temperature: 0, stream: true });
for await (const chunk of st) pieces += chunk.choices[0]?.delta?.content ?? '';
check('chat stream adds up to the whole answer', pieces === whole, JSON.stringify([pieces, whole]));

try {
  await client.completions.create({ model: 'no-such-model', prompt: 'x' });
  check('an unknown model is refused', false);
} catch (e) {
  check('an unknown model: APIError 404', e instanceof OpenAI.APIError && e.status === 404, String(e));
}
try {
  await new OpenAI({ baseURL: `${base}/v1`, apiKey: 'wrong', maxRetries: 0 }).models.list();
  check('a wrong key is refused', false);
} catch (e) {
  check('a wrong key: AuthenticationError 401', e instanceof OpenAI.AuthenticationError, String(e));
}
console.log(`openai client: ${pass} passed, ${fail} failed`);
process.exit(fail ? 1 : 0);
